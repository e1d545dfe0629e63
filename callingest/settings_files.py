"""``<NAME>_FILE=/path``: a setting read from a file (a Kubernetes Secret volume).

The value of ``<NAME>`` is the file's content, trailing newline stripped; giving both, or a
file that cannot be read, is a :class:`SettingsFileError` (exit 2, :mod:`callingest.settings`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic_settings import EnvSettingsSource


class SettingsFileError(ValueError):
    """A ``<NAME>_FILE`` that cannot be read, or given together with ``<NAME>``."""


class FileSettingsSource(EnvSettingsSource):
    """``<NAME>_FILE=/path``: the value of ``<NAME>`` is the file's content."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        fields = {name.upper() for name in self.settings_cls.model_fields}
        environ = {k.upper(): v for k, v in os.environ.items()}
        values: dict[str, str | None] = {}
        for key, path in environ.items():
            name = key.removesuffix("_FILE")
            if not key.endswith("_FILE") or name not in fields:
                continue
            if environ.get(name):
                raise SettingsFileError(f"{name} and {key} are both set; give one")
            try:
                values[name.lower()] = Path(path).read_text().rstrip("\r\n")
            except OSError as exc:
                raise SettingsFileError(f"{key}: cannot read {path}: {exc.strerror}") from None
        return values
