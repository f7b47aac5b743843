"""What the stand-in answers as kube-apiserver would (kube_standin.py): the Status bodies of its errors, validation
(422 with causes, 400 for a body that does not decode), label and field selectors, merge-patch, and RBAC's rule
matching."""
import json

from kube_standin_state import CONFIG_KEY, DIR, DNS_SUBDOMAIN, KINDS, LABEL_NAME, LABEL_VALUE, MICRO_TIME, state


def invalid(resource, name, causes):
    """422 Invalid, as apimachinery's errors.NewInvalid writes it: each cause a field and what is wrong with it."""
    kind, api_version = KINDS[resource]
    group = api_version.rpartition("/")[0]
    body = status(422, "Invalid", f'{kind}{"." + group if group else ""} "{name}" is invalid: '
                  + ", ".join(f"{field}: {message}" for field, message in causes))
    body["details"] = {"name": name, "group": group, "kind": kind,
                       "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes]}
    return 422, body


def validate(resource, namespace, name_in_url, obj):
    """None if `obj` would be stored by the API server, else (code, Status): 400 for a body that does not decode
    (as a MicroTime that is not RFC 3339 with six fractional digits) or names another object, 422 if invalid."""
    kind, api_version = KINDS[resource]
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata", {}), dict):
        return 400, status(400, "BadRequest", f"the object provided is unrecognized (must be of type {kind})")
    metadata = obj.get("metadata", {})
    if resource == "leases":
        for field in ("acquireTime", "renewTime"):
            value = (obj.get("spec") or {}).get(field)
            if value is not None and not (isinstance(value, str) and MICRO_TIME.match(value)):
                return 400, status(400, "BadRequest", f'{kind} in version "v1" cannot be handled as a {kind}: '
                                   f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": cannot parse')
    if namespace and metadata.get("namespace") not in (None, "", namespace):
        return 400, status(400, "BadRequest", "the namespace of the provided object does not match the namespace "
                           "sent on the request")
    name = metadata.get("name")
    if name_in_url is not None and name != name_in_url:
        return 400, status(400, "BadRequest", f"the name of the object ({name}) does not match the name on the URL "
                           f"({name_in_url})")
    causes = []
    if not name:
        causes.append(("metadata.name", "Required value: name or generateName is required"))
    elif not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN.match(name):
        causes.append(("metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of '
                       "lower case alphanumeric characters, '-' or '.'"))
    for key, value in (metadata.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if (prefix and not DNS_SUBDOMAIN.match(prefix)) or len(label) > 63 or not LABEL_NAME.match(label):
            causes.append((f"metadata.labels", f'Invalid value: "{key}": name part must consist of alphanumeric characters'))
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.match(value):
            causes.append((f"metadata.labels", f'Invalid value: "{value}": a valid label must be an empty string or '
                           "consist of alphanumeric characters, '-', '_' or '.'"))
    spec = obj.get("spec") or {}
    if resource == "leases":
        duration = spec.get("leaseDurationSeconds")
        if duration is not None and (not isinstance(duration, int) or duration <= 0):
            causes.append(("spec.leaseDurationSeconds", f"Invalid value: {duration}: must be greater than 0"))
        transitions = spec.get("leaseTransitions")
        if transitions is not None and (not isinstance(transitions, int) or transitions < 0):
            causes.append(("spec.leaseTransitions", f"Invalid value: {transitions}: must be greater than or equal to 0"))
    if resource == "configmaps":
        for key, value in (obj.get("data") or {}).items():
            if len(key) > 253 or not CONFIG_KEY.match(key):
                causes.append((f"data[{key}]", f'Invalid value: "{key}": a valid config key must consist of '
                               "alphanumeric characters, '-', '_' or '.'"))
            if not isinstance(value, str):
                return 400, status(400, "BadRequest", f'{kind} in version "v1" cannot be handled as a {kind}: '
                                   "json: cannot unmarshal into Go struct field ConfigMap.data of type string")
    return invalid(resource, name or "", causes) if causes else None


def failure(code, seconds):
    """The Status the API server answers `code` with, and the Retry-After it sends (None: no header)."""
    reasons = {429: ("TooManyRequests", "Too many requests, please try again later."),
               500: ("InternalError", "Internal error occurred: etcdserver: leader changed"),
               503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
               504: ("Timeout", "Timeout: request did not complete within the allotted timeout")}
    reason, message = reasons.get(code, ("InternalError", "Internal error occurred"))
    if code == 500 and seconds is not None:  # apimachinery's NewServerTimeout
        reason, message = "ServerTimeout", "The list operation against leases could not be completed at this time, please try again."
    body = status(code, reason, message)
    if seconds is not None:
        body["details"] = {"retryAfterSeconds": seconds}
    return body, seconds


def status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def matches(obj, labels, fields):
    if labels:
        key, _, value = labels.partition("=")
        if obj["metadata"].get("labels", {}).get(key) != value:
            return False
    if fields:
        key, _, value = fields.partition("=")
        if key != "metadata.name" or obj["metadata"]["name"] != value:
            return False
    return True


def merge(target, patch):
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


def subject_matches(subject, user, groups, account):
    """rbac/v1 subject matching, as the authorizer's appliesTo does."""
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        return subject.get("name") == account["name"] and subject.get("namespace") == account["namespace"]
    if kind == "User":
        return subject.get("name") == user
    if kind == "Group":
        return subject.get("name") in groups
    return False


def rule_allows(rule, verb, group, resource, name):
    """A PolicyRule's match, as rbac's RuleAllows: verb, API group, resource and, if the rule names any, the name."""
    def has(values, value):
        return "*" in (values or []) or value in (values or [])
    if not (has(rule.get("verbs"), verb) and has(rule.get("apiGroups"), group)
            and has(rule.get("resources"), resource)):
        return False
    names = rule.get("resourceNames") or []
    return not names or name in names


def rbac_allows(config, user, groups, verb, group, resource, namespace, name):
    """Whether a binding of the ServiceAccount grants the request: a ClusterRoleBinding's ClusterRole anywhere, a
    RoleBinding's Role or ClusterRole in the RoleBinding's namespace only (never a cluster-scoped resource)."""
    objects = config.get("objects", [])
    roles = {(o["kind"], o["metadata"].get("namespace", "") if o["kind"] == "Role" else "", o["metadata"]["name"]): o
             for o in objects if o.get("kind") in ("Role", "ClusterRole")}
    for binding in objects:
        if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(subject_matches(s, user, groups, config["serviceAccount"]) for s in binding.get("subjects") or []):
            continue
        where = binding["metadata"].get("namespace", "")
        if binding["kind"] == "RoleBinding" and (not namespace or where != namespace):
            continue
        ref = binding["roleRef"]
        role = roles.get((ref["kind"], where if ref["kind"] == "Role" else "", ref["name"]))
        if role and any(rule_allows(r, verb, group, resource, name) for r in role.get("rules") or []):
            return True
    return False


def forbidden(user, verb, group, resource, namespace, name):
    """403 as apimachinery's errors.NewForbidden writes it, with the authorizer's reason (forbiddenMessage)."""
    qualified = f"{resource}.{group}" if group else resource
    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    reason = f'User "{user}" cannot {verb} resource "{resource}" in API group "{group}" {where}'
    body = status(403, "Forbidden", f'{qualified}{f" {json.dumps(name)}" if name else ""} is forbidden: {reason}')
    body["details"] = {"group": group, "kind": resource, **({"name": name} if name else {})}
    return body


def too_large(version):
    """apiserver's storage.NewTooLargeResourceVersionError: 504 Timeout, retry in 1 s, cause ResourceVersionTooLarge."""
    body = status(504, "Timeout", f"Timeout: Too large resource version: {version}, current: {state['rv']}")
    body["details"] = {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                       "retryAfterSeconds": 1}
    return body


class WatchCut(Exception):
    """A watch cut as DIR/watch-cut says: nothing more is written to it."""


def rbac_user():
    """The ServiceAccount DIR/rbac.json names, as RBAC sees it: (user name, groups, its subject), or None (no RBAC)."""
    try:
        config = json.loads((DIR / "rbac.json").read_text())
    except FileNotFoundError:
        return None
    account = config["serviceAccount"]
    namespace, name = account["namespace"], account["name"]
    return (f"system:serviceaccount:{namespace}:{name}",
            ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"], config)
