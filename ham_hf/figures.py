"""Figures outside pyplot: the one helper every report and notebook plot draws on."""

from __future__ import annotations


def figure(**kwargs):
    """A matplotlib Figure outside pyplot: no global backend is touched (safe in threads and notebooks)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)
