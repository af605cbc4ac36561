"""Who may call what: the role each route needs, as data.

Two roles: ``annotator`` (view images, infer, save labels, ask for the next sample) and ``admin``
(everything an annotator may do, plus start or stop training and scoring, delete images and labels,
upload or delete models, read the server logs, reload the app). A few routes are public: the login
itself, the API description and static files of the API page.

Rules are tried in order; the first whose method set and path pattern match decides. A route that
no rule names needs ``admin`` (deny by default: a new MONAI Label endpoint is not opened by accident).
``OPTIONS`` (CORS pre-flight, which browsers send without credentials) is public.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PUBLIC", "ANNOTATOR", "ADMIN", "ROLES", "Rule", "RULES", "required_role", "role_allows"]

PUBLIC = "public"
ANNOTATOR = "annotator"
ADMIN = "admin"
ROLES = (ANNOTATOR, ADMIN)  # the roles a user can have, weakest first

_READ = frozenset({"GET", "HEAD"})
_ANY = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})


@dataclass(frozen=True)
class Rule:
    methods: frozenset[str]
    pattern: str
    role: str

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and re.fullmatch(self.pattern, path) is not None


def _r(methods, pattern: str, role: str) -> Rule:
    return Rule(frozenset(methods), pattern, role)


RULES: tuple[Rule, ...] = (
    # login, and the API page (its description is public: the code is open source)
    _r(_READ, r"/auth/?", PUBLIC),
    _r({"POST"}, r"/auth/token/?", PUBLIC),
    _r(_READ, r"/auth/token/valid/?", ANNOTATOR),
    _r(_READ, r"/|/docs/?|/openapi\.json|/favicon\.ico|/static/.*", PUBLIC),
    # annotators: look, infer, label, next sample
    _r(_READ, r"/info/?", ANNOTATOR),
    _r(_READ, r"/datastore/?|/datastore/.+", ANNOTATOR),
    _r({"PUT"}, r"/datastore/(image|label|image/info|label/info)/?", ANNOTATOR),
    _r({"POST"}, r"/infer/[^/]+/?", ANNOTATOR),
    _r({"POST"}, r"/activelearning/[^/]+/?", ANNOTATOR),
    _r(_READ, r"/(train|scoring|batch/infer|model)/?", ANNOTATOR),  # status and model list
    _r(_READ, r"/model/[^/]+/?|/model/info/[^/]+/?", ANNOTATOR),
    _r(_ANY, r"/session/?|/session/.+", ANNOTATOR),  # Slicer's upload-once-infer-many sessions
    _r(_READ, r"/ohif/?|/ohif/.+", ANNOTATOR),
    _r(_READ, r"/proxy/.+", ANNOTATOR),  # OHIF's DICOMweb reads through the server
    # admins: training, scoring, batch runs, deleting, models, logs (and everything not named above)
    _r({"POST", "DELETE"}, r"/(train|scoring|batch/infer)/?|/(train|scoring|batch/infer)/.+", ADMIN),
    _r({"DELETE"}, r"/datastore/.+", ADMIN),
    _r({"PUT", "DELETE"}, r"/model/.+", ADMIN),
    _r(_READ, r"/logs/?|/logs/.+", ADMIN),
)


def required_role(method: str, path: str) -> str:
    """The role a request needs (``public``, ``annotator`` or ``admin``)."""
    method = method.upper()
    if method == "OPTIONS":
        return PUBLIC
    for rule in RULES:
        if rule.matches(method, path):
            return rule.role
    return ADMIN


def role_allows(user_role: str, needed: str) -> bool:
    """Admins may do what annotators may; nobody without a role may do anything but public calls."""
    if needed == PUBLIC:
        return True
    if user_role not in ROLES:
        return False
    return ROLES.index(user_role) >= ROLES.index(needed)
