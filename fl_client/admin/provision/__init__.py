"""Provisioning: the project CA, and for every participant a folder to start from.

``project`` is the project file's schema, ``certs`` builds certificates (pure),
``layout`` decides folders and configs (pure), ``store`` writes them and keeps what
exists, ``cli`` is ``fl-provision``. Identity lives in the certificate subject: see
``common.identity``.
"""

from fl_client.admin.provision.project import Project
from fl_client.admin.provision.store import Outcome, provision

__all__ = ["Outcome", "Project", "provision"]
