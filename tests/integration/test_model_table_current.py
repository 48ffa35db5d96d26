"""The generated models table in docs/models.md is what benchmarks/model_table.py makes now."""
from helpers import ROOT

from benchmarks import model_table


def test_readme_table_is_current():
    readme = (ROOT / 'docs' / 'models.md').read_text()
    assert model_table.TARGET == ROOT / 'docs' / 'models.md'  # where --readme writes is the file checked here
    assert model_table.update_readme(readme, model_table.table()) == readme, \
        'docs/models.md model table is stale: run python benchmarks/model_table.py --readme'
