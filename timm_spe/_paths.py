""" Where the repository is, for an editable install (a git clone): the one place that knows it

Read by the code that works on the clone's own files (``hub_cards/``, ``train_recipes/``, ``README.md``, ``docs/``,
``benchmarks/``): an installed wheel has none of them, and every caller says what it does without them.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_CARDS = REPO_ROOT / 'hub_cards'  # staged Hub folders, one per '<model>.<tag>'
TRAIN_RECIPES = REPO_ROOT / 'train_recipes'  # train.py recipes, '<model>-<tag>.yaml' (./run.sh train)
