"""benchmarks/model_table.py: the model table of docs/models.md is what the script computes."""
from pathlib import Path

import pytest

from benchmarks import model_table

ROOT = Path(__file__).resolve().parents[1]


def test_stats_of_one_model():
    s = model_table.model_stats('resnet164_spe')
    assert s['params'] == 1736518
    assert 0.2 < s['gmacs'] < 0.3


def test_update_readme_replaces_only_the_block():
    text = f'a\n{model_table.BEGIN}\nold\n{model_table.END}\nb\n'
    assert model_table.update_readme(text, 'new') == f'a\n{model_table.BEGIN}\nnew\n{model_table.END}\nb\n'
    with pytest.raises(SystemExit, match='no'):
        model_table.update_readme('no markers', 'new')


@pytest.mark.slow
def test_readme_table_is_current():
    readme = (ROOT / 'docs' / 'models.md').read_text()
    assert model_table.TARGET == ROOT / 'docs' / 'models.md'  # where --readme writes is the file checked here
    assert model_table.update_readme(readme, model_table.table()) == readme, \
        'docs/models.md model table is stale: run python benchmarks/model_table.py --readme'
