from vmimg.cli.quick import entry

entry()
