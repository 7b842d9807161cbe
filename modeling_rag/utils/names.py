"""Model names as saved files record them: a Hub id or a short name, never a folder of the machine that saved them."""

from __future__ import annotations

import os

__all__ = ["portable_name"]


def portable_name(name_or_path: str | os.PathLike | None) -> str | None:
    """`name_or_path` as a saved config or index records it: a Hub id or plain name as it is; a local folder
    as the Hub id of the known base model it holds (the installed defaults), else as the folder's name."""
    if name_or_path is None:
        return None
    name = os.fspath(name_or_path)
    if not (os.path.isabs(name) or name.startswith(("~", "./", "../", ".\\"))):
        return name
    from ..model_card import base_model_id  # imported here: model_card pulls in the Hub client

    return base_model_id(name) or os.path.basename(os.path.normpath(os.path.expanduser(name)))
