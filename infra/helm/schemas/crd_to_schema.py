"""Write kubeconform's JSON schema for each version of a CustomResourceDefinition.

    python infra/helm/schemas/crd_to_schema.py CRD.yaml [SOURCE] > ...   (see README.md)

The same conversion kubeconform's own openapi2jsonschema does, in strict form: every
object that lists its properties refuses others (unless the CRD says
x-kubernetes-preserve-unknown-fields), int-or-string fields take either, nullable fields
take null. Output: <group>/<kind>_<version>.json beside this file, the layout that
``-schema-location '{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json'`` reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def strict(node: Any) -> Any:
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict(value) for key, value in node.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "string"}, {"type": "integer"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def main() -> None:
    crd = yaml.safe_load(Path(sys.argv[1]).read_text())
    source = sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    for version in crd["spec"]["versions"]:
        schema = strict(version["schema"]["openAPIV3Schema"])
        schema["$comment"] = f"{kind} {group}/{version['name']} from {source} (crd_to_schema.py)"
        target = HERE / group / f"{kind.lower()}_{version['name']}.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(target.relative_to(HERE))


if __name__ == "__main__":
    main()
