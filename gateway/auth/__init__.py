"""Authentication of archive users (X-USERNAME / X-PASSWORD) and their API permissions."""
from .credentials import CredentialCache, hash_password
from .permissions import API_PERMISSIONS, expand_permissions

__all__ = ["API_PERMISSIONS", "CredentialCache", "expand_permissions", "hash_password"]
