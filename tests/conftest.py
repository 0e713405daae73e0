import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def wandistiller_home(tmp_path_factory):
    """Build tiny teachers into a fresh per-session home, so tests never depend on a user's cache."""
    home = tmp_path_factory.mktemp("wandistiller_home")
    old = os.environ.get("WANDISTILLER_HOME")
    os.environ["WANDISTILLER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("WANDISTILLER_HOME", None)
    else:
        os.environ["WANDISTILLER_HOME"] = old


@pytest.fixture(scope="session")
def tiny_teacher(wandistiller_home):
    from wandistiller.teacher import load_teacher

    return load_teacher("tiny-a14b", device_strategy="cpu")


@pytest.fixture(scope="session")
def tiny_ti2v_teacher(wandistiller_home):
    from wandistiller.teacher import load_teacher

    return load_teacher("tiny-ti2v-5b", device_strategy="cpu")
