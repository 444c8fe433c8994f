"""Files and folders this project writes get the umask's mode, so a cluster group can read them."""

from __future__ import annotations


def test_locally_built_models_are_readable_by_the_group(tmp_path):
    """A build goes through a private temporary directory (0700); what lands is the umask's mode."""
    from nemo_dft.data.io import umask
    from nemo_dft.demo.tiny_model import tiny_tokenizer_dir

    built = tiny_tokenizer_dir(tmp_path)
    assert built.stat().st_mode & 0o777 == 0o777 & ~umask()
    assert {p.stat().st_mode & 0o777 for p in built.iterdir()} == {0o666 & ~umask()}
