"""The method table is the one place that lists the methods; everything else reads it."""

import ast

from mta_ray.cli import build_parser
from mta_ray.config import Config
from mta_ray.core.methods import BASELINES, MERGING, METHOD_NAMES, METHODS, PROPOSED, RAG, TRAINED, method
from tests.test_layers import package_modules


def test_the_table_says_what_each_method_trains_merges_and_retrieves():
    assert METHOD_NAMES == ("base", "rag_k1", "rag_k3", "rag_k5", "oppu", "adapt_only", "merged_only", "mta")
    assert TRAINED == ("mta", "oppu", "adapt_only") and PROPOSED not in BASELINES
    assert MERGING == ("merged_only", "mta") and RAG == ("rag_k1", "rag_k3", "rag_k5")
    assert [METHODS[m].rag_k for m in RAG] == [1, 3, 5]
    assert method("mta").recipe == method("adapt_only").recipe == "adapt" and method("oppu").recipe == "oppu"
    assert method("merged_only").recipe is None and not method("merged_only").trained


def test_config_and_cli_take_their_choices_from_the_table():
    assert Config().eval.methods == list(METHOD_NAMES)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    kind = next(a for a in sub.choices["personalize"]._actions if a.dest == "kind")
    assert tuple(kind.choices) == TRAINED and kind.default == PROPOSED


def test_no_other_module_spells_a_list_of_method_names():
    names = set(METHOD_NAMES)
    found = []
    for module, source in package_modules().items():
        if module == "mta_ray.core.methods":
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
                spelled = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names]
                if len(spelled) >= 2:
                    found.append(f"{module}:{node.lineno} {spelled}")
    assert not found, found
