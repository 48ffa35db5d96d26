"""``python -m timm_spe.cli``: the ``timm-spe`` command (run.sh calls it this way)"""
import sys

from . import main

if __name__ == '__main__':
    main(sys.argv[1:])
