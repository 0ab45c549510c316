"""Report rendering: section contexts -> Jinja2 HTML -> WeasyPrint PDF."""
