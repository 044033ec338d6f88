"""train_net.py on N processes (Detectron2's launcher), recording what OHEM mined: the
multi-process tests' harness. Same command line as train_net.py; OUTPUT_DIR must be given.

Each process writes <OUTPUT_DIR>/mined_rank<r>.pt: per readonly pass, the per-RoI losses of
each of its images and their hard sets (boxes and labels), on the CPU.
"""

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from detectron2.engine import launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import train_net  # noqa: E402
from ohem_d2.modeling.ohem import HardExampleMiner, ReadonlyScorer  # noqa: E402


def worker(args, out):
    records = []
    losses, select = ReadonlyScorer.losses, HardExampleMiner.select

    def recording_losses(self, box_predictor, predictions, proposals):
        result = losses(self, box_predictor, predictions, proposals)
        records.append({"losses": [x.cpu() for x in result]})
        return result

    def recording_select(self, proposals, predictions, box_predictor):
        hard = select(self, proposals, predictions, box_predictor)
        records[-1]["hard"] = [(h.proposal_boxes.tensor.cpu(), h.gt_classes.cpu()) for h in hard]
        return hard

    ReadonlyScorer.losses, HardExampleMiner.select = recording_losses, recording_select
    train_net.main(args)
    torch.save(records, os.path.join(out, f"mined_rank{comm.get_rank()}.pt"))


if __name__ == "__main__":
    args = train_net.parse_args()
    out = args.opts[args.opts.index("OUTPUT_DIR") + 1]
    train_net.check_setup(args)
    launch(worker, args.num_gpus, dist_url=args.dist_url, args=(args, out))
