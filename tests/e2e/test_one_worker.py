"""How tests/e2e/conftest.py marks the tests here: `browser` for those that open the frontend (the newest-frontend
run of `dev.py test` selects them), and the pytest-xdist group that keeps those sharing one server on one worker
(`--dist loadgroup`); the soak, which starts its own servers, is a group of its own, and so are the trainer starts
that share one fork server (tests/test_trainer_faults.py)."""

import pytest

pytestmark = [pytest.mark.e2e]


def test_the_tests_sharing_the_server_are_one_group_and_those_opening_the_frontend_are_browser_tests(request):
    items = request.session.items
    here = [item for item in items if "tests/e2e/" in item.nodeid]
    assert request.node in here  # the checks below cover whichever tests here were collected with it
    groups = {item.nodeid: [m.args for m in item.iter_markers("xdist_group")] for item in here}
    for nodeid, group in groups.items():
        expected = ("soak",) if "/test_soak_e2e.py::" in nodeid else ("e2e",)
        assert group == [expected], (nodeid, group)
    # Outside: only the trainer starts sharing one fork server (tests/test_trainer_faults.py's `launcher`) are a group.
    elsewhere = {item.nodeid: [m.args for m in item.iter_markers("xdist_group")] for item in items if item not in here}
    assert {n: g for n, g in elsewhere.items() if g} == {
        item.nodeid: [("trainer_faults",)] for item in items if item not in here and "launcher" in item.fixturenames}
    if getattr(request.config.option, "loadgroup", False):  # a pytest-xdist worker under --dist loadgroup
        # The groups were there when pytest-xdist read them: it names each test of a group by it.
        wrong = [n for n, group in groups.items() if not n.endswith(f"@{group[0][0]}")]
        assert not wrong, f"pytest-xdist did not see these tests' group: {wrong}"

    browser = {item.nodeid for item in items if item.get_closest_marker("browser")}
    assert browser == {item.nodeid for item in here if {"frontend", "fresh_install"} & set(item.fixturenames)}
    assert not any("soak" in n for n in browser)
