"""Paper §1: the vanishing feature in one figure, on the linear networks of §4.

The chapter takes only where things live (``data_root``, ``device``, ``cache_dir``); the models and
sizes are those of chapter ``linear_networks`` at the same profile, so both chapters share their zoo
entries.
"""
from __future__ import annotations

from typing import Any

from ..config import Config, resolve
from . import linear_networks
from .common import check_config


def linear_config(cfg: Config) -> Config:
    """The ``linear_networks`` config at ``cfg``'s profile, with ``cfg``'s data root, device and cache."""
    check_config(cfg, "introduction")
    return resolve("linear_networks", cfg.profile, data_root=cfg.data_root, device=cfg.device,
                   cache_dir=cfg.cache_dir)


def run(cfg: Config, progress: bool = True) -> linear_networks.LinearResult:
    """Fig. 1: the §4 edge models merged along α (:func:`vfnb.chapters.linear_networks.run`)."""
    return linear_networks.run(linear_config(cfg), progress=progress)


def book_map() -> Any:
    """The map of the book: every page of ``_toc.yml`` with its summary (:func:`vfnb.book.map_html`)."""
    from IPython.display import HTML

    from ..book import map_html
    return HTML(map_html(current="01_introduction"))
