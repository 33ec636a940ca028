from ombot.cli import main

main()
