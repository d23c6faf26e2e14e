"""The run's reports: the run document, the HTML summary, redaction and strict JSON."""
