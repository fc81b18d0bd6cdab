"""Read-only web dashboard for coordinators under /dashboard (see views.py)."""

from gateway.dashboard.views import bp

__all__ = ["bp"]
