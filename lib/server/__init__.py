"""What stands between the network and MONAI Label's routes: authentication and roles, the upload
size limit, inference admission (503 when busy), and thread-run endpoints (see :mod:`.install`)."""

from .install import ServerOptions, install
from .policy import ADMIN, ANNOTATOR, required_role
from .users import AuthError, TokenIssuer, UserStore

__all__ = ["ServerOptions", "install", "ADMIN", "ANNOTATOR", "required_role", "AuthError", "TokenIssuer",
           "UserStore"]
