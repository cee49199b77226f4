#!/usr/bin/env python
"""Global structured pruning with the seed's flags; the same as ``prunellm prune``.

Example:
    python run_global_pruning.py --base_model smollm2-135m --output_name smollm2_p20 \
        --pruning_ratio 0.2 --importance_method taylor --run_evaluation ppl
"""

import sys

from prunellm.cli import main

if __name__ == "__main__":
    sys.exit(main(["prune", *sys.argv[1:]]))
