"""The faulted runs' config and the folder of its uninterrupted run, trained once per session."""
import pytest

from .harness import train_here, write_config


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder)
    return config, train_here(config, folder / "out")
