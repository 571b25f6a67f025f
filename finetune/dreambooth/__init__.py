"""DreamBooth's data: instances paired with class images, and the class images planned, named and generated."""
