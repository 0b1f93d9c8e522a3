mod sandbox;
mod task;
