"""KubeRay's semantic rules that its CRD schemas do not express (the operator refuses such objects at runtime):
worker-group sizes, RayJob deletion rules, RayService upgrade strategies. `cluster/k8s.py` checks every object
it renders with `kuberay_errors` before writing; tests/test_k8s.py checks the rendered overlays again."""
from __future__ import annotations


def cluster_spec_errors(spec: dict, where: str) -> list[str]:
    """KubeRay's semantic rules that its CRD schema does not express (the operator rejects these at runtime)."""
    errors = []
    names = [g.get("groupName") for g in spec.get("workerGroupSpecs", [])]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"{where}: worker group name {dup!r} is not unique")
    for g in spec.get("workerGroupSpecs", []):
        low, high = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
        replicas = g.get("replicas", low)
        if not 0 <= low <= replicas <= high:
            errors.append(f"{where}: group {g.get('groupName')!r} needs 0 <= minReplicas ({low}) <= replicas "
                          f"({replicas}) <= maxReplicas ({high})")
    if spec.get("enableInTreeAutoscaling") and not spec.get("rayVersion"):
        errors.append(f"{where}: in-tree autoscaling needs rayVersion")
    return errors


_DELETION_ORDER = {"DeleteWorkers": 0, "DeleteCluster": 1, "DeleteSelf": 2}  # KubeRay: TTLs in this order
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")


def job_spec_errors(spec: dict, where: str) -> list[str]:
    """KubeRay's RayJob validation of deletion rules (ValidateRayJobSpec), beyond the CRD schema."""
    errors = []
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules") or []
    if rules and spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: deletionRules and shutdownAfterJobFinishes cannot be used together")
    if spec.get("ttlSecondsAfterFinished") and not spec.get("shutdownAfterJobFinishes"):
        errors.append(f"{where}: ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    autoscaling = (spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling")
    seen, ttls = set(), {}
    for rule in rules:
        condition, policy = rule["condition"], rule["policy"]
        status = condition.get("jobStatus") or condition.get("jobDeploymentStatus")
        if (status, policy) in seen:
            errors.append(f"{where}: duplicate deletion rule {policy} on {status}")
        seen.add((status, policy))
        if policy == "DeleteWorkers" and autoscaling:
            errors.append(f"{where}: DeleteWorkers is refused for a RayCluster with autoscaling")
        ttls.setdefault(status, []).append((_DELETION_ORDER.get(policy, -1), condition.get("ttlSeconds", 0)))
    for status, pairs in ttls.items():
        in_order = [ttl for _, ttl in sorted(pairs)]
        if in_order != sorted(in_order):
            errors.append(f"{where}: on {status} TTLs must not decrease DeleteWorkers -> DeleteCluster -> DeleteSelf")
    return errors


def service_spec_errors(spec: dict, where: str) -> list[str]:
    """KubeRay's RayService upgradeStrategy rules: known type; incremental needs its options and autoscaling."""
    strategy = spec.get("upgradeStrategy") or {}
    kind = strategy.get("type", "NewCluster")
    if kind not in UPGRADE_TYPES:
        return [f"{where}: upgradeStrategy.type {kind!r} is not one of {', '.join(UPGRADE_TYPES)}"]
    errors = []
    if kind == "NewClusterWithIncrementalUpgrade":
        options = strategy.get("clusterUpgradeOptions") or {}
        if not options.get("gatewayClassName"):
            errors.append(f"{where}: incremental upgrade needs clusterUpgradeOptions.gatewayClassName")
        surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent", -1)
        if not (0 <= step <= surge <= 100):
            errors.append(f"{where}: need 0 <= stepSizePercent ({step}) <= maxSurgePercent ({surge}) <= 100")
        if options.get("intervalSeconds", 0) <= 0:
            errors.append(f"{where}: intervalSeconds must be > 0")
        if not (spec.get("rayClusterConfig") or {}).get("enableInTreeAutoscaling"):
            errors.append(f"{where}: incremental upgrade needs the Ray autoscaler (enableInTreeAutoscaling)")
    return errors


def kuberay_errors(obj: dict) -> list[str]:
    """Every semantic rule above for one KubeRay object (RayCluster, RayJob or RayService)."""
    errors = [e for where, spec in ray_cluster_specs(obj) for e in cluster_spec_errors(spec, where)]
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") == "RayJob":
        errors += job_spec_errors(obj.get("spec") or {}, where)
    if obj.get("kind") == "RayService":
        errors += service_spec_errors(obj.get("spec") or {}, where)
    return errors


def ray_cluster_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, RayCluster spec) inside a RayCluster, RayJob or RayService."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    spec = obj.get("spec") or {}
    inner = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
             "RayService": spec.get("rayClusterConfig")}.get(obj.get("kind"))
    return [(name, inner)] if inner else []
