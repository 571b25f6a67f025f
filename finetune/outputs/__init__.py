"""What every run saves: files written whole, the metadata each output records (its base named without this machine's
folders), and whole pipelines."""
