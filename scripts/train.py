#!/usr/bin/env python
"""Entry script of a training job: the same file runs locally, under torchrun, or on SageMaker.

    python scripts/train.py --config configs/tiny-cpu.yaml --train.epochs 3

SageMaker runs it as ``python train.py --config ... --section.key value ...`` with SM_* set; see
``sftbridge.training.train`` for how that environment is read.
"""

import sys

from sftbridge.training.train import main

if __name__ == "__main__":
    sys.exit(main())
