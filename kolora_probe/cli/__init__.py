"""The kolora-probe command line: main.py parses, one module per subcommand (HELP, add_arguments, run)."""
