#!/usr/bin/env python
"""Recovery fine-tuning of a pruned model with the seed's flags; the same as ``prunellm finetune`` (LoRA by default).

Example:
    python finetune_lora.py --pruned_model results/smollm2_p20 --data_path bigbench_natural_instructions \
        --lora_r 8 --num_epochs 1 --learning_rate 1e-4 --batch_size 64 --micro_batch_size 4

Multi-process (DDP; on a machine without GPUs the engine uses the CPU/gloo backend):
    accelerate launch --multi_gpu --num_processes 2 finetune_lora.py --pruned_model ...
"""

import sys

from prunellm.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
