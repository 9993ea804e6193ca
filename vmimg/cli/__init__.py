"""The command line: click commands that turn options into library calls and errors into exits."""
