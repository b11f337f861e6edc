fn main() {
    match kube_prefetch::api::crd_yaml() {
        Ok(yaml) => print!("{yaml}"),
        Err(error) => eprintln!("{error}"),
    }
}
