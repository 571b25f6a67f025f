"""`finetune eval`: scores on the toy world, and the command around them."""
