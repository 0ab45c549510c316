"""The report's Jinja2 templates and print CSS, installed as the package `reportgen.templates` (see
pyproject.toml) so that `importlib.resources` finds them in a wheel and in an editable install alike."""
