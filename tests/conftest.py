import os

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared-data folder for the whole session (built-in builders prepare into it)."""
    path = str(tmp_path_factory.mktemp("tfds_data"))
    old = os.environ.get("JAXKD_DATA_DIR")
    os.environ["JAXKD_DATA_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("JAXKD_DATA_DIR", None)
    else:
        os.environ["JAXKD_DATA_DIR"] = old
