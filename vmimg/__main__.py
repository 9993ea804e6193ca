from vmimg.cli.main import entry

entry()
