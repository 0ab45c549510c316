"""The spec: YAML with line numbers (`yaml_lines`) -> validated pydantic models (`fields`, `schema`, and the
section models of `reportgen.analyses`) -> resolved paths (`load`).

This package module imports nothing: `reportgen.spec.schema` imports every section type's module, and
those import `reportgen.spec.fields`, which would otherwise pull the whole spec in half-way through.
"""
