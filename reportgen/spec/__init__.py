"""The spec: YAML with line numbers -> validated pydantic models -> resolved paths."""

from reportgen.spec.load import load_spec, spec_sha256
from reportgen.spec.schema import Spec, json_schema

__all__ = ["Spec", "json_schema", "load_spec", "spec_sha256"]
