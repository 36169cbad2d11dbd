"""Node-side CBIOS: what runs on the node itself (the build installs it into the root).

Standard library only: the node has python3 and nothing else of ours."""
