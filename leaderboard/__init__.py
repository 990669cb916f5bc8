"""Static leaderboard site (accuracy versus compression), built from results/: ``build_site(results, out)``."""

from leaderboard.site import build_site

__all__ = ["build_site"]
