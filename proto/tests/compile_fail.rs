//! No safe code can keep a view of a mapped ring past the value that owns
//! the mapping: each of these programs must fail to compile.

#[cfg(not(loom))]
#[test]
fn views_of_a_mapping_cannot_outlive_it() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
