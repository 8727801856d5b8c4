"""Property-based fuzzing of every input door (tests/fuzz_cases.py): each generated recipe,
override, pattern or receipt either works or raises MegacppError. A few hundred cases here;
``scripts/fuzz.py`` runs the same properties for 10,000."""

import pytest

from tests.fuzz_cases import PROPERTIES, property_test

#: cases per property in CI (about 500 in all)
CASES = {"recipe_text": 80, "recipe_bytes": 40, "recipe_mutation": 100, "set_overrides": 80,
         "pattern": 100, "receipt_bytes": 50, "receipt_mutation": 120}


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_input_works_or_raises_the_projects_error(tmp_path, name):
    property_test(name, tmp_path, CASES[name])()
