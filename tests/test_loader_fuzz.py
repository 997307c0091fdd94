"""A fixed-seed share of the loader fuzz (tests/loader_fuzz.py; `python tests/loader_fuzz.py` runs 1,000 files):
every mutated file through Load Nested Encoder or Load Nested Subject and through `describe`, in a worker
process bounded in time and memory; only the pack's own errors, NaN / Inf refused by name."""

from __future__ import annotations

import loader_fuzz as fuzz
import pytest


def test_each_mutation_is_a_pure_function_of_seed_and_index():
    seeds = {"encoder": fuzz.join({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                   "__metadata__": {"format": "x"}}, bytes(8))}
    seeds["ip-adapter"] = seeds["subject"] = seeds["encoder"]
    for index in range(3 * len(fuzz.MUTATIONS)):
        assert fuzz.case(seeds, 7, index) == fuzz.case(seeds, 7, index)
    assert {fuzz.case(seeds, 7, i)[1] for i in range(3 * len(fuzz.MUTATIONS))} == set(fuzz.MUTATIONS)


@pytest.mark.slow
def test_mutated_files_get_only_the_packs_own_errors_and_nan_weights_are_refused_by_name():
    files = 13 * 3 * 5  # each of the 13 mutations 5 times on each of the 3 seed files
    report = fuzz.fuzz(files, seed=0, case_timeout=60, memory_mb=1024)
    print(fuzz.summary(report))
    assert report.files == files
    assert not report.failures, fuzz.summary(report)
    assert set(report.by_mutation) == set(fuzz.MUTATIONS)
    errors = set(report.outcomes["Load Nested Encoder"]) | set(report.outcomes["Load Nested Subject"])
    assert errors <= {"loaded", "NestedWeightsError", "NestedEncoderLoadError", "SubjectError"}, errors
    assert set(report.outcomes["describe"]) <= {"exit 0", "exit 1"}
