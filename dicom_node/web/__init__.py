"""The node's web dashboard, JSON API and Prometheus metrics (docs/dashboard.md)."""

from dicom_node.web.app import create_app
from dicom_node.web.server import WebServer

__all__ = ["WebServer", "create_app"]
