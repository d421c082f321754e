"""The per-user API permissions of the archive API v1 spec."""

API_PERMISSIONS = (
    "api_instance_upload",
    "api_get_patient",
    "api_delete_patient",
    "api_get_study",
    "api_list_studies",
    "api_delete_study",
    "api_get_series",
    "api_list_series",
    "api_dicom_get",
    "api_delete_series",
    "api_series_results",
    "api_add_series_results",
    "api_list_forms",
    "api_add_form_submission",
)


def expand_permissions(names):
    """Permission names as given on the command line ('all' meaning every one); ValueError for unknown names."""
    expanded = []
    for name in names:
        if name == "all":
            expanded.extend(API_PERMISSIONS)
        elif name in API_PERMISSIONS:
            expanded.append(name)
        else:
            raise ValueError(f"unknown permission {name!r} (known: all, {', '.join(API_PERMISSIONS)})")
    return sorted(set(expanded))
