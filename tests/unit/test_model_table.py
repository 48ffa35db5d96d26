"""benchmarks/model_table.py: the model table of docs/models.md is what the script computes."""

import pytest

from benchmarks import model_table


def test_stats_of_one_model():
    s = model_table.model_stats('resnet164_spe')
    assert s['params'] == 1736518
    assert 0.2 < s['gmacs'] < 0.3


def test_update_readme_replaces_only_the_block():
    text = f'a\n{model_table.BEGIN}\nold\n{model_table.END}\nb\n'
    assert model_table.update_readme(text, 'new') == f'a\n{model_table.BEGIN}\nnew\n{model_table.END}\nb\n'
    with pytest.raises(SystemExit, match='no'):
        model_table.update_readme('no markers', 'new')


