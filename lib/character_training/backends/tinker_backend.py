"""The real Tinker service, built only from the environment.

The API key never travels through parameters, notebooks or logs: the SDK reads
``TINKER_API_KEY`` (and optionally ``TINKER_BASE_URL``) from the environment itself. We only
check that the key is present, so a missing key fails at once with one actionable line
instead of deep inside the first network call.
"""

from __future__ import annotations

import os

from ..errors import MissingCredentialsError

API_KEY_VARIABLE = "TINKER_API_KEY"
BASE_URL_VARIABLE = "TINKER_BASE_URL"


def create_tinker_service_client():
    """Return a ``tinker.ServiceClient`` configured from the environment."""
    if not os.environ.get(API_KEY_VARIABLE, "").strip():
        raise MissingCredentialsError(
            f"backend 'tinker' needs {API_KEY_VARIABLE} in the environment: run "
            f"`export {API_KEY_VARIABLE}=...` (key from the Tinker console) or use the "
            "offline backend with `backend: local`"
        )
    import tinker

    return tinker.ServiceClient(base_url=os.environ.get(BASE_URL_VARIABLE) or None)
