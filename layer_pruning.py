#!/usr/bin/env python
"""Per-layer rate allocation with the seed's flags; the same as ``prunellm prune --allocation layerwise``.

Example:
    python layer_pruning.py --base_model smollm2-135m --save_ckpt_log_name smollm2_layerwise \
        --pruning_ratio 0.2 --pruning_strategy inverse --layer_importance_method removal \
        --test_original_ppl True --test_after_prune True --eval_seq_len 128
"""

import sys

from prunellm.cli import main, translate_seed_layer_flags

if __name__ == "__main__":
    sys.exit(main(translate_seed_layer_flags(sys.argv[1:])))
