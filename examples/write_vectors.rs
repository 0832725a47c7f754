//! Rewrites `proto/vectors.json` from the frames in
//! `tests/vectors/frames.rs`: `cargo run --example write_vectors`. Review
//! the diff before committing: a changed vector is a protocol change.

#[path = "../tests/vectors/frames.rs"]
mod frames;

fn main() {
    let built = frames::build();
    std::fs::write(
        frames::PATH,
        serde_json::to_string_pretty(&built).expect("vectors encode") + "\n",
    )
    .expect("proto/vectors.json is writable");
    println!("wrote {} vectors to {}", built.len(), frames::PATH);
}
