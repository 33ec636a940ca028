from ombot.app.cli import main  # the process entry: the one place the base reaches the root

main()
