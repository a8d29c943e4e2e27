from adaptive_vit.cli import main

if __name__ == "__main__":
    main()
